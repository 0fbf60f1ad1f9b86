"""cpcoord node agent: process discovery, freeze, maps/pagemap, trackers, capture, restore.

Never imports `coordinator`; shares values and errors through `cpcoord`.
"""
