"""Administrative use cases: validate, write and audit in one transaction.

The CLI, the TUI and the ops procedures all call these, so a rule is enforced the same way whichever door
a change comes through.
"""
