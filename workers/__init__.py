"""prefixfleet.workers"""
