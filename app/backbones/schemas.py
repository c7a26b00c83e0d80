from pydantic import BaseModel


class Backbone(BaseModel):
    name: str
    pretrained_tags: list[str]
    num_params: int
    input_size: list[int]
    weights_available: bool
    weights_source: str | None


class BackboneList(BaseModel):
    total: int
    data: list[Backbone]
