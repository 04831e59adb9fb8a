"""llb_edge/data"""
