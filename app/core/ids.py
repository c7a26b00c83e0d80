"""Path parameters, validated by pattern before anything looks them up (a malformed id is a 422
naming the parameter; a well-formed one that is not the caller's is a 404)."""

from typing import Annotated

from fastapi import Path

HEX_ID = "[0-9a-f]{24}"
BIGINT_MAX = 2**63 - 1  # the bound of every client-given number that reaches an SQL query or column
NAME = "[a-z0-9][a-z0-9._-]{0,99}"  # model names, as JobCreate.model_name
ALIAS = "[a-z][a-z0-9_-]{0,63}"

DATASET_ID = f"^ds_{HEX_ID}$"  # also in request bodies that name a dataset

DatasetId = Annotated[str, Path(pattern=DATASET_ID)]
JobId = Annotated[str, Path(pattern=f"^job_{HEX_ID}$")]
SweepId = Annotated[str, Path(pattern=f"^sweep_{HEX_ID}$")]
TenantId = Annotated[str, Path(pattern=f"^tn_{HEX_ID}$")]
KeyId = Annotated[str, Path(pattern=f"^key_{HEX_ID}$")]
WebhookId = Annotated[str, Path(pattern=f"^wh_{HEX_ID}$")]
DeliveryId = Annotated[str, Path(pattern=f"^msg_{HEX_ID}$")]
ModelRef = Annotated[
    str,
    Path(
        pattern=f"^(model_{HEX_ID}|{NAME}@([0-9]{{1,9}}|{ALIAS}))$",
        description="A model id, `name@version` or `name@alias` (e.g. `pets@production`).",
    ),
]
ModelName = Annotated[str, Path(pattern=f"^{NAME}$")]
AliasName = Annotated[str, Path(pattern=f"^{ALIAS}$", description="e.g. production, staging")]
