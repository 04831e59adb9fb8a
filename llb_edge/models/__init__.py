"""llb_edge/models"""
