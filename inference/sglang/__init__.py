"""The SGLang engine: its HTTP request bodies, response parsing and a balancing client."""
