//! Kanali controller.
