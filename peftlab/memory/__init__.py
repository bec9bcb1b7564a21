"""Memory: the estimate (which asks the methods for their terms) and the measurement of a real step."""
