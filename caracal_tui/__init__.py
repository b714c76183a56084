"""``caracal-tui``: the live operations dashboard, built on the ops toolkit."""
