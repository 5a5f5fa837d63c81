"""Thin routers: parse, call the handler held in app state, return.  `ROUTERS` is what the app mounts."""

from service.routes import adapters, chat, completions, models, ops, tokenize

ROUTERS = (ops.router, models.router, completions.router, chat.router, tokenize.router, adapters.router)
