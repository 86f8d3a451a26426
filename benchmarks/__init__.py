"""Performance harness: each module measures one ratio side by side; ``run.py`` prints the table."""
