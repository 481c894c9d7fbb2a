"""Services: what a route does, in one place, flushing and never committing."""
