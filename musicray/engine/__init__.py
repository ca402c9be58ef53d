"""Generation engines: what decodes a stage's prompts under its grammar, apart from how songs are served.

* ``decode``: musicray's own KV-cached loop with the grammar mask computed in process (``musicray.compose.Composer``
  runs its stages on it);
* ``vllm_engine``: the same stages on vLLM's async engine (continuous batching, multi-LoRA), with
  ``grammar_processor``, the grammar as a vLLM v1 logits processor;
* ``bar_events``: a stage's bars as they are generated, the events streaming sends;
* ``streaming``: ``musicray generate --stream``, one song on an in-process vLLM engine, printed bar by bar;
* ``available``: whether vLLM is installed here (light: no vLLM, Ray or torch import).

The stage sequence itself (prompts, plans, budgets, the check of every answer) is ``musicray.compose.StagePlanner``'s;
an engine only decodes. ``musicray.serve`` puts these engines behind HTTP and Ray Serve.
"""
