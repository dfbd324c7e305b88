"""mope"""
