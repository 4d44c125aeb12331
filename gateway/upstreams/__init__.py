"""Everything about the upstreams a route can reach: connection pools and the HTTP exchange
(`transport`), targets and strategy, the failover rules, passive health, the provider quota."""
