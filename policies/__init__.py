"""Pure policy logic: the model catalog, tenant rules, the decision engine and cost estimates.

Nothing here does I/O (beyond reading the shipped catalog.yaml) or imports `gateway`, aiohttp or
redis (a test guards this): time, catalog and routes are passed in.

- `catalog` / `entry` / `catalog.yaml`: the models, loaded, merged with the config and validated
- `sizes`: `WxH` arithmetic and gpt-image-2's arbitrary-size rule
- `rules`: the `Policy` model; `tenant`: what each policy field means, clamps, and `auto` pins
- `capabilities`: what a model itself refuses; `end_user`: who a request is made for
- `engine`: `evaluate` -> `Decision` (model resolution, checks, adjustments); `findings`: its parts
- `cost`: the estimate reserved before a call and the actual cost from `usage`
"""
