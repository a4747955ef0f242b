"""The offline persona world: small English personas with checkable preferences, a
deterministic rubric critic (rubric.py) and the data files prepare.py builds from them."""
