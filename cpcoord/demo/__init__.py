"""`cpcoord demo`: a coordinator, an agent and a two-member sample job, end to end."""
