//! Between the API types and the pure core: the mappings that the
//! controller and the agents both need, in one place so that they can never
//! disagree (for example on which policy applies to a VM).

pub mod conditions;
pub mod policy;
