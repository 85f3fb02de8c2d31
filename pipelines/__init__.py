"""prefixfleet.pipelines"""
