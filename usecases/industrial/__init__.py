"""Industrial use case: vibration-based motor and bearing condition monitoring."""
