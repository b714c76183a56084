"""The dashboard's views and dialogs."""
