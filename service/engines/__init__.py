"""Serving engines.  `service.engines.base.ENGINES` maps a name to an Engine class;
importing `service.engines.hf` / `service.engines.vllm` registers them (the
scheduler does), so importing the interface alone stays light."""
