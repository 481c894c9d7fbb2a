"""POST /v1/fine_tuning/estimates: the cost calculator's endpoint (filled by the estimates work)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
