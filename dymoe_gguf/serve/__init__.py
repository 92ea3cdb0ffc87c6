"""``dymoe-gguf serve``: llama-cpp-python's OpenAI-compatible server with the controller attached.

Needs the ``server`` extra (``pip install 'dymoe-gguf[server]'``). ``server.serve`` runs it;
``app.create_app`` builds the app; ``model`` keeps every call into the ``Llama`` on one thread.
"""
