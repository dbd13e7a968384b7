//! Resources that handlers borrow, registered once at start-up: database pools, HTTP clients,
//! anything `Send + Sync`. Looked up by type; a handler gets them from its [`super::JobContext`].

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

/// Resources by type. Cheap to clone.
#[derive(Clone, Default)]
pub struct Resources {
    map: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resources")
            .field("count", &self.map.len())
            .finish()
    }
}

impl Resources {
    /// No resources.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `value`, replacing an earlier one of the same type.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        self.map.insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The resource of type `T`, if registered.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.map.get(&TypeId::of::<T>())?.downcast_ref::<T>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_found_by_type() {
        struct Pool(u32);
        let mut r = Resources::new();
        r.insert(Pool(4));
        r.insert(String::from("x"));
        assert_eq!(r.get::<Pool>().map(|p| p.0), Some(4));
        assert_eq!(r.get::<String>().map(String::as_str), Some("x"));
        assert!(r.get::<u8>().is_none());
    }
}
