"""What routes are handed (FastAPI dependencies): the Service created at start-up."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from medsim.service.state import Service


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
