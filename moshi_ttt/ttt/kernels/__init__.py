"""ttt/kernels"""
