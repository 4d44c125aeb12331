"""A route's targets for one request: the order to try them in (the route's strategy), the body
each one is sent, and the estimate that covers whichever of them serves.

* `failover` (the default) tries the targets in their configured order.
* `weighted` draws the order by weight, without replacement: the first target is target i with
  probability weight_i / sum of weights, and the others remain as fallbacks in weighted order.

Each target gets the evaluated body with its own model id and its flavor's required fields
(DigitalOcean: `n`, `size`, `partial_images` when streaming), exactly as a one-target route does.
A target whose flavor cannot take the request (gpt-image-1 at DigitalOcean takes fewer sizes and
only n=1: the catalog's `flavors` overlay) is skipped unsent (`refuses`).
The tenant's reservation is made once, before the first attempt, so it covers the costliest target
(each of images, tokens and USD at its highest), and is never below what is billed.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from gateway.runtime import Route, Target
from policies import capabilities
from policies.cost import Cost, estimate
from policies.engine import Adjustment, for_flavor
from policies.entry import ModelEntry, Operation
from policies.uploads import GENERATE, Inputs


def ordered(route: Route, rng: random.Random) -> list[Target]:
    """The targets of `route` in the order this request tries them."""
    if route.strategy == "failover" or len(route.targets) == 1:
        return list(route.targets)
    left, order = list(route.targets), []
    while left:
        pick = rng.choices(range(len(left)), weights=[t.weight for t in left])[0]
        order.append(left.pop(pick))
    return order


def body_for(target: Target, body: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[Adjustment, ...]]:
    """What `target`'s upstream is sent (its model id), and what its flavor added."""
    assert target.entry is not None  # every target of a runtime route has its catalog entry
    sent, added = for_flavor(target.entry, body, target.flavor)
    sent["model"] = target.upstream_model
    return sent, added


def refuses(target: Target, body: Mapping[str, Any], operation: Operation) -> bool:
    """Whether `target`'s flavor of the model cannot take `body` (it would answer 400): then it is
    skipped, never sent. The route's first flavor was judged by the policy engine already."""
    assert target.entry is not None
    entry = target.entry.on(target.flavor)
    return capabilities.check(entry, body_for(target, body)[0], target.upstream_model, operation) is not None


def covering_estimate(route: Route, body: Mapping[str, Any], inputs: Inputs = GENERATE) -> Cost:
    """The estimate at the highest price among `route`'s targets that can serve the operation,
    limit by limit. Targets that price the same body with the same catalog entry (an OpenAI and a
    DigitalOcean target of one model when the request names `n` and `size`) are estimated once."""
    costs: list[Cost] = []
    estimated: list[tuple[ModelEntry, dict[str, Any]]] = []
    for target in route.targets:
        assert target.entry is not None
        if inputs.operation not in target.operations:
            continue
        sent = for_flavor(target.entry, body, target.flavor)[0]  # its model id changes no price
        if not any(entry is target.entry and done == sent for entry, done in estimated):
            estimated.append((target.entry, sent))
            costs.append(estimate(sent, target.entry, inputs))
    if not costs:  # none can: the request is refused unsent, at whatever the first would cost
        assert route.targets[0].entry is not None
        costs.append(estimate(body, route.targets[0].entry, inputs))
    if len(costs) == 1:
        return costs[0]
    return Cost(
        images=max(c.images for c in costs),
        text_in_tokens=max(c.text_in_tokens for c in costs),
        image_in_tokens=max(c.image_in_tokens for c in costs),
        image_out_tokens=max(c.image_out_tokens for c in costs),
        nano_usd=max(c.nano_usd for c in costs),
    )
