"""One-off studies behind figures in the docs: TokenFLEX's flexible-count claim, CoreMatching's decode sweep."""
