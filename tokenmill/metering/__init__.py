"""Energy, cost and roofline: what every token cost, measured per request."""

from tokenmill.metering.accounting import StepAccountant
from tokenmill.metering.meters import EnergyMeter, EstimatedMeter, MeterUnavailable, NvmlMeter, RaplMeter, make_meter

__all__ = ["EnergyMeter", "EstimatedMeter", "MeterUnavailable", "NvmlMeter", "RaplMeter", "StepAccountant",
           "make_meter"]
