"""The only place that talks to llama.cpp / ggml through ctypes (private)."""
