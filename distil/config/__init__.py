"""The configuration schema: what each config key accepts (`schema.py`), checked by every command first."""
