"""curate's own fetch layer: an SSRF-guarded, bounded HTTP client (http.py, policy.py), the
X-Robots-Tag parser (robots.py) and image validation before decoding (images.py).
curate/stages/fetch.py drives them per shard and hands valid images to img2dataset's Resizer.
See docs/FETCH.md for the design and what each status means."""
