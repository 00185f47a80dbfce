"""GET /v1/models: one card per preset -- ``<model>`` (the default preset) and ``<model>:<preset>`` -- plus
``<model>:auto`` when the server offers the auto preset."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from serving.api.deps import check_api_key, get_engine, get_settings
from serving.presets import AUTO
from serving.protocol import ModelCard, ModelList

router = APIRouter(dependencies=[Depends(check_api_key)])


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    info = get_engine(request).info
    presets = info.presets

    def card(model_id: str, preset: str) -> ModelCard:
        return ModelCard(
            id=model_id,
            root=info.name,
            max_model_len=info.max_model_len,
            preset=preset,
            placement=presets.get(preset).spec,
        )

    cards = [card(info.name, presets.default)] + [card(f"{info.name}:{p}", p) for p in presets.names]
    if get_settings(request).auto is not None:  # chosen per request: the response's model id names the choice
        cards.append(
            ModelCard(id=f"{info.name}:{AUTO}", root=info.name, max_model_len=info.max_model_len, preset=AUTO,
                      placement=AUTO)
        )
    return ModelList(data=cards)
