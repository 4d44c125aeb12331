"""Pure policy logic: the model catalog, tenant rules, the decision engine and cost estimates.

Nothing here does I/O or imports `gateway`, aiohttp or redis (a test guards this): time,
catalog and routes are passed in.
"""
