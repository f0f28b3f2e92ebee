"""CI gates: memory budgets and policy checks."""
