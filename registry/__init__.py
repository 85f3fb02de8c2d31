"""prefixfleet.registry"""
