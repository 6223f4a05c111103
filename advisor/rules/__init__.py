"""The seeds' decision rules as data (rules.yaml) and the engine that evaluates them over a scenario.

    from advisor.rules import parse_scenario, facts_from_scenario, evaluate
    ev = evaluate(facts_from_scenario(parse_scenario(request_json)))
    ev.decision, ev.method, ev.ranking, ev.suggestions_for(ev.method), ev.conflicts_for(ev.method)
"""

from advisor.rules.engine import (
    FACT_NAMES,
    FACTS,
    Evaluation,
    RuleSet,
    RulesError,
    evaluate,
    evaluate_scenario,
    facts_from_scenario,
    load_rules,
)
from advisor.rules.scenario import DECISIONS, PRIORITIES, SYMPTOMS, TASKS, Scenario, parse_scenario

__all__ = [
    "DECISIONS", "FACTS", "FACT_NAMES", "PRIORITIES", "SYMPTOMS", "TASKS", "Evaluation", "RuleSet", "RulesError",
    "Scenario", "evaluate", "evaluate_scenario", "facts_from_scenario", "load_rules", "parse_scenario",
]
