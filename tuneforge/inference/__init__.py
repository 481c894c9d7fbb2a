"""The inference engine: `tuneforge inference`, the process that serves base models, fine-tuned
adapters and checkpoints behind `/v1/chat/completions` and `/v1/completions`.

The API process never imports this package's engine (it stays free of torch): it checks the
caller's project, resolves the model name to a base model and an adapter object in the store, and
forwards the request over HTTP (`tuneforge.inference.protocol` is the only module both sides use).

- `server`: the engine's HTTP app (OpenAI's request and answer shapes, SSE streaming).
- `engine`: one decoding loop per base model that batches sequences of different adapters together
  through PEFT's mixed-adapter batches, and an LRU cache of loaded adapters per base.
- `adapters`: fetching adapter archives from the object store on first use.
"""
