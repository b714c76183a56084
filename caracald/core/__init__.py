"""The pure domain: money, windows, policies, allowlists, pricebook. No I/O lives here."""
