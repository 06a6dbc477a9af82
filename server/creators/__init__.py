"""The creator side: earnings, two-factor and cash-out, LIVE goals, sessions, gifts on videos."""
