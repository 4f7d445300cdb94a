"""Scale-out on Ray Serve: many engine replicas over one shared adapter store, routed by adapter name."""
