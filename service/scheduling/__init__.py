"""Which request runs on which engine, and when weights change (SPEC §6 lives here and only here).

`errors` is a leaf (the HTTP layer maps these exceptions to statuses without loading an engine);
`scheduler` holds the queues, the slots and the dispatch loop.
"""
