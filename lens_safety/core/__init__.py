"""The ground floor: errors, verified artifact store, statistics, validation, pinned assets, processes, figure
primitives and offline HTML."""
