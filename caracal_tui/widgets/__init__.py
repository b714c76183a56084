"""Widgets the views share: title bar, alert banner, status line, filter line, snapshot table."""
