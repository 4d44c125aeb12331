"""The admin API (api.py), mounted at `/admin` when `admin.token` is set."""

from gateway.admin.api import create_admin_app

__all__ = ["create_admin_app"]
