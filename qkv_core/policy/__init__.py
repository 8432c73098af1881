"""`codec = "auto"`: what to send (the text, or a KV card and its codec), chosen per request."""
