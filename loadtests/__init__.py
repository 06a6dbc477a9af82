"""Load tests: the headless storm runner, its ceilings, and a locustfile."""
