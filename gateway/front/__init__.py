"""The front door: everything between a client's socket and tenant code. Connections and the HTTP
layer's own errors (`connections`), request bodies (`body`), load shedding before admission
(`admission`), each request's id, access-log line and error rendering (`access_log`), and tenant
keys (`auth`)."""
