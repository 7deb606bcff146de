"""HTTP front door: dependencies, error mapping and middleware shared by every router."""
